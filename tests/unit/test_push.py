"""Pushes as this product adds to the spec: loading into Docker, pushed content vs Docker's, deletes that
respect Docker's own images, cache eviction by DELETE with `ns`, and abandoned uploads."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from aiohttp import encode_basic_auth
from aiohttp.test_utils import TestClient

from k3d_registry_dockerd.cache import maintenance
from k3d_registry_dockerd.cache.store import Store
from k3d_registry_dockerd.common.metrics import Metrics
from k3d_registry_dockerd.oci.errors import RegistryError
from k3d_registry_dockerd.oci.manifests import parse_pushed
from k3d_registry_dockerd.push.uploads import Uploads, parse_content_range
from k3d_registry_dockerd.web.app import create_app
from k3d_registry_dockerd.web.assembly import Registry, assemble
from k3d_registry_dockerd.web.auth import Htpasswd
from k3d_registry_dockerd.web.routes import REGISTRY

from .fakes import FakeDocker, local_image
from .saves import DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, Image, digest_of, make_image, make_index

APP = "docker.io/library/my-app:dev"


@pytest.fixture
def docker() -> FakeDocker:
    return FakeDocker()


async def make(
    aiohttp_client: Any, store: Store, docker: FakeDocker, write_auth: Htpasswd | None = None, **options: Any
) -> tuple[TestClient, Registry]:
    registry = assemble(store, docker, **options)  # type: ignore[arg-type]
    return await aiohttp_client(create_app(registry, write_auth=write_auth)), registry


async def push_blob(client: TestClient, name: str, data: bytes) -> str:
    digest = digest_of(data)
    response = await client.post(f"/v2/{name}/blobs/uploads/?digest={digest}", data=data)
    assert response.status == 201, await response.text()
    return digest


async def push_image(client: TestClient, name: str, image: Image, tag: str) -> str:
    for data in (image.config, *image.layers):
        await push_blob(client, name, data)
    response = await client.put(
        f"/v2/{name}/manifests/{tag}", data=image.manifest, headers={"Content-Type": image.media_type}
    )
    assert response.status == 201, await response.text()
    return response.headers["Docker-Content-Digest"]


async def settle(registry: Registry) -> None:
    """Waits for background loads into Docker."""
    await registry.loads.idle()


async def manifest_digest(client: TestClient, path: str) -> str | None:
    response = await client.get(path)
    return response.headers["Docker-Content-Digest"] if response.status == 200 else None


# ---- loading into Docker ---------------------------------------------------------------------------


async def test_pushed_image_is_loaded_into_docker_and_served_byte_exact(
    aiohttp_client: Any, store: Store, docker: FakeDocker
) -> None:
    client, registry = await make(aiohttp_client, store, docker)
    image = make_image("pushed", docker_media_types=True)
    digest = await push_image(client, "my-app", image, "dev")
    await settle(registry)
    assert docker.loads == [APP]
    assert docker.images[APP].id == image.config_digest
    # Docker now has it too, but the pushed bytes are what is served: no export of Docker's copy.
    got = await client.get("/v2/my-app/manifests/dev")
    assert await got.read() == image.manifest
    assert got.headers["Content-Type"] == DOCKER_MANIFEST
    assert got.headers["Docker-Content-Digest"] == digest
    assert docker.saves == []
    assert store.record("docker.io/library/my-app").loaded == {"dev": image.config_digest}


async def test_no_load_pushed(aiohttp_client: Any, store: Store, docker: FakeDocker) -> None:
    client, registry = await make(aiohttp_client, store, docker, load_pushed=False)
    await push_image(client, "my-app", make_image("pushed"), "dev")
    await settle(registry)
    assert docker.loads == []


async def test_foreign_platform_is_not_loaded_and_says_why(
    aiohttp_client: Any, store: Store, docker: FakeDocker, caplog: pytest.LogCaptureFixture
) -> None:
    client, registry = await make(aiohttp_client, store, docker)
    caplog.set_level(logging.INFO)
    await push_image(client, "my-app", make_image("arm", arch="arm64"), "dev")
    await settle(registry)
    assert docker.loads == []
    assert "not loading docker.io/library/my-app:dev into Docker" in caplog.text
    assert "arm64" in caplog.text


async def test_index_push_loads_the_host_platform_child(
    aiohttp_client: Any, store: Store, docker: FakeDocker
) -> None:
    client, registry = await make(aiohttp_client, store, docker)
    amd, arm = make_image("amd"), make_image("arm", arch="arm64")
    for child in (amd, arm):
        await push_image(client, "multi", child, child.digest)
    index = make_index(
        [(amd, {"os": "linux", "architecture": "amd64"}), (arm, {"os": "linux", "architecture": "arm64"})]
    )
    response = await client.put("/v2/multi/manifests/v1", data=index, headers={"Content-Type": OCI_INDEX})
    assert response.status == 201
    await settle(registry)
    assert docker.images["docker.io/library/multi:v1"].id == amd.config_digest
    got = await client.get("/v2/multi/manifests/v1")
    assert await got.read() == index


async def test_docker_unreachable_push_still_lands(
    aiohttp_client: Any, store: Store, docker: FakeDocker
) -> None:
    client, registry = await make(aiohttp_client, store, docker)
    docker.unavailable = True
    image = make_image("offline")
    digest = await push_image(client, "my-app", image, "dev")
    await settle(registry)
    assert await manifest_digest(client, "/v2/my-app/manifests/dev") == digest


# ---- pushed content vs Docker's ----------------------------------------------------------------------


async def test_a_push_never_moves_a_tag_docker_already_has(
    aiohttp_client: Any, store: Store, docker: FakeDocker, caplog: pytest.LogCaptureFixture
) -> None:
    docker.images[APP] = own = local_image("docker-built", APP)
    client, registry = await make(aiohttp_client, store, docker)
    with caplog.at_level(logging.WARNING):
        digest = await push_image(client, "my-app", make_image("pushed"), "dev")
        await settle(registry)
    assert docker.loads == []
    assert docker.images[APP].id == own.id
    assert f"Docker's own my-app:dev ({own.id}) stays as it is" in caplog.text
    assert "--allow-docker-overwrite" in caplog.text
    # The push landed: the registry serves it under its name.
    assert await manifest_digest(client, "/v2/my-app/manifests/dev") == digest


async def test_a_tag_this_registry_loaded_follows_later_pushes_across_restarts(
    aiohttp_client: Any, store: Store, docker: FakeDocker
) -> None:
    client, registry = await make(aiohttp_client, store, docker)
    await push_image(client, "my-app", first := make_image("first"), "dev")
    await settle(registry)
    assert docker.images[APP].id == first.config_digest
    restarted = Store(store.root)
    restarted.open()
    client, registry = await make(aiohttp_client, restarted, docker)
    await push_image(client, "my-app", second := make_image("second"), "dev")
    await settle(registry)
    assert docker.loads == [APP, APP]
    assert docker.images[APP].id == second.config_digest
    assert restarted.record("docker.io/library/my-app").loaded == {"dev": second.config_digest}


async def test_a_loaded_tag_rebuilt_in_docker_is_docker_s_again(
    aiohttp_client: Any, store: Store, docker: FakeDocker
) -> None:
    client, registry = await make(aiohttp_client, store, docker)
    await push_image(client, "my-app", make_image("first"), "dev")
    await settle(registry)
    docker.images[APP] = rebuilt = local_image("rebuilt", APP)
    await push_image(client, "my-app", make_image("second"), "dev")
    await settle(registry)
    assert docker.loads == [APP]
    assert docker.images[APP].id == rebuilt.id


async def test_allow_docker_overwrite(aiohttp_client: Any, store: Store, docker: FakeDocker) -> None:
    docker.images[APP] = local_image("docker-built", APP)
    client, registry = await make(aiohttp_client, store, docker, allow_docker_overwrite=True)
    image = make_image("pushed")
    await push_image(client, "my-app", image, "dev")
    await settle(registry)
    assert docker.loads == [APP]
    assert docker.images[APP].id == image.config_digest


async def test_pushed_wins_over_docker_image_of_the_same_name(
    aiohttp_client: Any, store: Store, docker: FakeDocker
) -> None:
    docker.images[APP] = local_image("docker-built", APP)
    client, _registry = await make(aiohttp_client, store, docker, load_pushed=False)
    digest = await push_image(client, "my-app", make_image("pushed"), "dev")
    assert await manifest_digest(client, "/v2/my-app/manifests/dev") == digest
    assert docker.saves == []


async def test_docker_rebuild_after_the_push_is_served(
    aiohttp_client: Any, store: Store, docker: FakeDocker
) -> None:
    client, registry = await make(aiohttp_client, store, docker)
    pushed = await push_image(client, "my-app", make_image("pushed"), "dev")
    await settle(registry)
    docker.images[APP] = rebuilt = local_image("rebuilt", APP)
    assert await manifest_digest(client, "/v2/my-app/manifests/dev") == rebuilt.image.digest
    # What was pushed stays servable by digest.
    assert await manifest_digest(client, f"/v2/my-app/manifests/{pushed}") == pushed


async def test_pushed_tags_are_listed_with_dockers(
    aiohttp_client: Any, store: Store, docker: FakeDocker
) -> None:
    docker.images["docker.io/library/my-app:docker"] = local_image("d", "docker.io/library/my-app:docker")
    client, _registry = await make(aiohttp_client, store, docker, load_pushed=False)
    await push_image(client, "my-app", make_image("pushed"), "dev")
    listed = await (await client.get("/v2/my-app/tags/list")).json()
    assert listed == {"name": "my-app", "tags": ["dev", "docker"]}
    assert "my-app" in (await (await client.get("/v2/_catalog")).json())["repositories"]


# ---- deletes ---------------------------------------------------------------------------------------


async def test_deleting_a_pushed_tag_untags_what_was_loaded(
    aiohttp_client: Any, store: Store, docker: FakeDocker
) -> None:
    client, registry = await make(aiohttp_client, store, docker)
    digest = await push_image(client, "my-app", make_image("pushed"), "dev")
    await settle(registry)
    assert (await client.delete("/v2/my-app/manifests/dev")).status == 202
    assert docker.removes == [APP]
    assert (await client.get("/v2/my-app/manifests/dev")).status == 404
    assert await manifest_digest(client, f"/v2/my-app/manifests/{digest}") == digest


async def test_deleting_a_pushed_tag_leaves_a_later_docker_image_alone(
    aiohttp_client: Any, store: Store, docker: FakeDocker
) -> None:
    client, registry = await make(aiohttp_client, store, docker)
    await push_image(client, "my-app", make_image("pushed"), "dev")
    await settle(registry)
    docker.images[APP] = local_image("rebuilt", APP)
    assert (await client.delete("/v2/my-app/manifests/dev")).status == 202
    assert docker.removes == []
    assert APP in docker.images


async def test_docker_images_are_not_deleted_by_default(
    aiohttp_client: Any, store: Store, docker: FakeDocker
) -> None:
    docker.images[APP] = local_image("docker-built", APP)
    client, _registry = await make(aiohttp_client, store, docker)
    served = await manifest_digest(client, "/v2/my-app/manifests/dev")
    for path in ("/v2/my-app/manifests/dev", f"/v2/my-app/manifests/{served}"):
        response = await client.delete(path)
        assert response.status == 405
        assert "--allow-docker-delete" in (await response.json())["errors"][0]["message"]
    assert docker.removes == []
    assert await manifest_digest(client, "/v2/my-app/manifests/dev") == served


async def test_allow_docker_delete(aiohttp_client: Any, store: Store, docker: FakeDocker) -> None:
    docker.images[APP] = local_image("docker-built", APP)
    client, _registry = await make(aiohttp_client, store, docker, allow_docker_delete=True)
    await manifest_digest(client, "/v2/my-app/manifests/dev")
    assert (await client.delete("/v2/my-app/manifests/dev")).status == 202
    assert docker.removes == [APP]
    assert (await client.get("/v2/my-app/manifests/dev")).status == 404


async def test_delete_with_ns_evicts_the_cache_only(
    aiohttp_client: Any, store: Store, docker: FakeDocker
) -> None:
    docker.images["docker.io/library/alpine:latest"] = image = local_image(
        "alpine", "docker.io/library/alpine:latest"
    )
    client, _registry = await make(aiohttp_client, store, docker)
    path = "/v2/library/alpine/manifests/latest?ns=docker.io"
    assert await manifest_digest(client, path) == image.image.digest
    layer = image.image.layer_digests[0]
    assert store.has_blob(layer)
    assert (await client.delete(path)).status == 202
    assert not store.has_blob(layer)
    assert docker.removes == []
    assert (await client.delete(path)).status == 404
    # The next pull exports again.
    assert await manifest_digest(client, path) == image.image.digest
    assert docker.saves == ["docker.io/library/alpine:latest"] * 2


async def test_pushed_content_is_never_evicted(aiohttp_client: Any, store: Store, docker: FakeDocker) -> None:
    client, registry = await make(aiohttp_client, store, docker, load_pushed=False)
    image = make_image("pushed")
    await push_image(client, "my-app", image, "dev")
    assert (await registry.records.evict(0, set())).dropped == []
    assert all(store.has_blob(d) for d in image.blobs())
    assert maintenance.prune(store, older_than=0).blobs == 0


# ---- uploads ---------------------------------------------------------------------------------------


async def test_abandoned_uploads_are_dropped(store: Store) -> None:
    uploads = Uploads(store, Metrics(), idle_timeout=0.0)
    upload = await uploads.start("docker.io/library/x")
    await asyncio.to_thread(upload.writer.write, b"partial")
    assert len(list(store.tmp_dir.iterdir())) == 1
    assert await uploads.expire() == 1
    assert len(uploads) == 0
    assert list(store.tmp_dir.iterdir()) == []
    await uploads.close()


async def test_upload_expiry_runs_in_the_app(aiohttp_client: Any, store: Store, docker: FakeDocker) -> None:
    client, _registry = await make(aiohttp_client, store, docker)
    uploads = client.app[REGISTRY].uploads
    response = await client.post("/v2/my-app/blobs/uploads/")
    assert response.status == 202
    uploads.idle_timeout = 0.0
    assert await uploads.expire() == 1
    assert (await client.get(response.headers["Location"])).status == 404


async def stalled_request(client: TestClient, method: str, path: str) -> bytes:
    """Sends the headers and 10 of the 100 body bytes they announce, then nothing; what comes back until
    the registry closes the connection."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\nContent-Type: x/y\r\n\r\n"
    writer.write(head.encode() + b"0123456789")
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()


async def test_a_stalled_body_drops_its_upload_and_frees_its_slot(
    aiohttp_client: Any, store: Store, docker: FakeDocker
) -> None:
    # A second apart: at the bound, a session left that long would be dropped for the next one.
    client, registry = await make(aiohttp_client, store, docker, body_timeout=1.0, max_uploads=1)
    started = await client.post("/v2/my-app/blobs/uploads/")
    location = started.headers["Location"]
    # The one slot is taken: another upload is asked to come back later.
    refused = await client.post("/v2/other/blobs/uploads/")
    assert refused.status == 429 and refused.headers["Retry-After"].isdigit()
    assert (await refused.json())["errors"][0]["code"] == "TOOMANYREQUESTS"

    answer = await stalled_request(client, "PATCH", location)
    assert answer.startswith(b"HTTP/1.1 408 ") and b"BLOB_UPLOAD_INVALID" in answer
    assert b"Connection: close" in answer
    assert len(registry.uploads) == 0 and list(store.tmp_dir.iterdir()) == []
    assert (await client.get(location)).status == 404
    metrics = registry.metrics
    assert metrics.stalled_bodies.labels("upload")._value.get() == 1
    # The slot is free again; a stalled monolithic upload and manifest leave nothing behind either.
    data = b"after the stall"
    assert await push_blob(client, "my-app", data) == digest_of(data)
    answer = await stalled_request(client, "POST", f"/v2/my-app/blobs/uploads/?digest={digest_of(b'x')}")
    assert answer.startswith(b"HTTP/1.1 408 ")
    answer = await stalled_request(client, "PUT", "/v2/my-app/manifests/v1")
    assert answer.startswith(b"HTTP/1.1 408 ") and b"MANIFEST_INVALID" in answer
    assert len(registry.uploads) == 0 and list(store.tmp_dir.iterdir()) == []
    assert (await client.get("/v2/my-app/manifests/v1")).status == 404


async def test_at_the_bound_a_session_opened_and_left_makes_room(
    aiohttp_client: Any, store: Store, docker: FakeDocker
) -> None:
    client, registry = await make(aiohttp_client, store, docker, body_timeout=0.2, max_uploads=1)
    left = (await client.post("/v2/my-app/blobs/uploads/")).headers["Location"]
    await asyncio.sleep(0.3)
    assert (await client.post("/v2/other/blobs/uploads/")).status == 202
    assert len(registry.uploads) == 1 and (await client.get(left)).status == 404
    assert len(list(store.tmp_dir.iterdir())) == 1


def test_content_range_forms() -> None:
    assert parse_content_range("0-99") == (0, 99)
    assert parse_content_range("bytes 100-199/*") == (100, 199)
    for bad in ("", "5", "9-1", "a-b"):
        with pytest.raises(RegistryError):
            parse_content_range(bad)


async def test_wrong_digest_leaves_nothing_behind(
    aiohttp_client: Any, store: Store, docker: FakeDocker
) -> None:
    client, _registry = await make(aiohttp_client, store, docker)
    response = await client.post(f"/v2/my-app/blobs/uploads/?digest={digest_of(b'other')}", data=b"data")
    assert response.status == 400
    assert (await response.json())["errors"][0]["code"] == "DIGEST_INVALID"
    assert list(store.tmp_dir.iterdir()) == []
    assert not store.has_blob(digest_of(b"data"))


# ---- manifest validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "content_type", "why"),
    [
        (b"not json", OCI_MANIFEST, "not JSON"),
        (b"[]", OCI_MANIFEST, "object"),
        (json.dumps({"schemaVersion": 1}).encode(), OCI_MANIFEST, "schemaVersion"),
        (json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST}).encode(), OCI_MANIFEST, "config"),
        (json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX}).encode(), OCI_INDEX, "manifests"),
        (json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST}).encode(), OCI_INDEX, "does not match"),
        (json.dumps({"schemaVersion": 2, "mediaType": "text/plain"}).encode(), None, "unsupported"),
        (
            json.dumps(
                {"schemaVersion": 2, "config": {"mediaType": "x", "digest": "sha256:abc", "size": 1}}
            ).encode(),
            OCI_MANIFEST,
            "config",
        ),
        (
            json.dumps(
                {"schemaVersion": 2, "config": {"mediaType": "x", "digest": digest_of(b""), "size": -1}}
            ).encode(),
            OCI_MANIFEST,
            "size",
        ),
    ],
)
def test_invalid_manifests(body: bytes, content_type: str | None, why: str) -> None:
    with pytest.raises(RegistryError) as raised:
        parse_pushed(body, content_type)
    assert raised.value.code == "MANIFEST_INVALID"
    assert why in raised.value.message


def test_manifest_without_media_type_takes_the_content_type() -> None:
    image = make_image("bare")
    data = json.loads(image.manifest)
    del data["mediaType"]
    parsed = parse_pushed(json.dumps(data).encode(), f"{OCI_MANIFEST}; charset=utf-8")
    assert parsed.media_type == OCI_MANIFEST
    assert parsed.references == [image.config_digest, *image.layer_digests]
    assert parsed.artifact_type == "application/vnd.oci.image.config.v1+json"


def test_records_written_before_push_support_still_load(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.open()
    old = {
        "version": 1,
        "name": "docker.io/library/x",
        "tags": {
            "a": {
                "digest": "sha256:" + "1" * 64,
                "media_type": OCI_MANIFEST,
                "image_id": "i",
                "exported_at": 1.0,
            }
        },
        "manifests": {"sha256:" + "1" * 64: {"media_type": OCI_MANIFEST, "size": 3, "references": []}},
    }
    (store.records_dir / "x.json").write_text(json.dumps(old))
    store.open()
    record = store.record("docker.io/library/x")
    assert record is not None and record.blobs == [] and not record.tags["a"].pushed


def test_records_that_kept_loaded_per_tag_still_load(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.open()
    entry = {"digest": "sha256:" + "1" * 64, "media_type": OCI_MANIFEST, "exported_at": 1.0, "pushed": True}
    old = {
        "version": 1,
        "name": "docker.io/library/x",
        "tags": {
            "a": {**entry, "image_id": "sha256:loaded", "loaded": True},
            "b": {**entry, "image_id": "i"},
        },
        "manifests": {"sha256:" + "1" * 64: {"media_type": OCI_MANIFEST, "size": 3, "references": []}},
    }
    (store.records_dir / "x.json").write_text(json.dumps(old))
    store.open()
    record = store.record("docker.io/library/x")
    assert record is not None and record.loaded == {"a": "sha256:loaded"}
    assert sorted(record.tags) == ["a", "b"]


async def test_mount_only_from_pushed_content(aiohttp_client: Any, store: Store, docker: FakeDocker) -> None:
    """A blob exported from Docker (maybe a private upstream's) cannot be mounted into another name."""
    ref = "docker.io/team/private:1"
    docker.images[ref] = image = local_image("private", ref)
    client, _registry = await make(aiohttp_client, store, docker, load_pushed=False)
    assert await manifest_digest(client, "/v2/team/private/manifests/1") == image.image.digest
    layer = image.image.layer_digests[0]
    response = await client.post(f"/v2/elsewhere/blobs/uploads/?mount={layer}&from=team/private")
    assert response.status == 202
    assert (await client.get(f"/v2/elsewhere/blobs/{layer}")).status == 404
    pushed = await push_blob(client, "team/pushed", b"pushed bytes")
    response = await client.post(f"/v2/elsewhere/blobs/uploads/?mount={pushed}&from=team/pushed")
    assert response.status == 201
    assert await (await client.get(f"/v2/elsewhere/blobs/{pushed}")).read() == b"pushed bytes"


async def test_full_disk_drops_the_upload_and_names_the_cache(
    aiohttp_client: Any, store: Store, docker: FakeDocker, monkeypatch: pytest.MonkeyPatch
) -> None:
    client, _registry = await make(aiohttp_client, store, docker)
    started = await client.post("/v2/my-app/blobs/uploads/")

    def full(self: Any, chunk: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("k3d_registry_dockerd.cache.store.BlobWriter.write", full)
    response = await client.patch(started.headers["Location"], data=b"x" * 100)
    assert response.status == 507
    assert str(store.root) in (await response.json())["errors"][0]["message"]
    assert list(store.tmp_dir.iterdir()) == []
    assert (await client.get(started.headers["Location"])).status == 404


async def test_a_mirror_request_for_a_pushed_name_does_not_pull_over_it(
    aiohttp_client: Any, store: Store, docker: FakeDocker
) -> None:
    """`team/app:v1` pushed here is Docker's docker.io/team/app:v1: containerd asking with ns=docker.io
    gets it, and no upstream pull replaces it."""
    docker.upstream["docker.io/team/app:v1"] = local_image("hub", "docker.io/team/app:v1")
    client, _registry = await make(aiohttp_client, store, docker, load_pushed=False)
    digest = await push_image(client, "team/app", make_image("pushed"), "v1")
    assert await manifest_digest(client, "/v2/team/app/manifests/v1?ns=docker.io") == digest
    assert docker.pulls == []
    assert await manifest_digest(client, "/v2/team/app/manifests/v1") == digest


# ---- write access ----------------------------------------------------------------------------------


@pytest.fixture
def htpasswd(tmp_path: Path) -> Htpasswd:
    path = tmp_path / "htpasswd"
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(rounds=4)).decode()
    path.write_text(f"pusher:{hashed}\n")
    return Htpasswd(path, "dev pushes")


async def test_writes_need_htpasswd_credentials_reads_do_not(
    aiohttp_client: Any, store: Store, docker: FakeDocker, htpasswd: Htpasswd
) -> None:
    docker.images["docker.io/library/local:1"] = local_image("local", "docker.io/library/local:1")
    client, registry = await make(aiohttp_client, store, docker, write_auth=htpasswd)
    image = make_image("pushed")
    blob = image.layers[0]
    anonymous = [
        client.post(f"/v2/my-app/blobs/uploads/?digest={digest_of(blob)}", data=blob),
        client.post("/v2/my-app/blobs/uploads/"),
        client.put("/v2/my-app/manifests/dev", data=image.manifest),
        client.delete("/v2/my-app/manifests/dev"),
        client.delete(f"/v2/my-app/blobs/{digest_of(blob)}"),
        client.get("/v2/"),
    ]
    wrong = {"Authorization": encode_basic_auth("pusher", "guess")}
    for request in [*anonymous, client.put("/v2/my-app/manifests/dev", data=b"{}", headers=wrong)]:
        response = await request
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == 'Basic realm="dev pushes"'
        assert (await response.json())["errors"][0]["code"] == "UNAUTHORIZED"
    # Reads stay anonymous: the cluster's pulls, with or without its pull secret.
    assert (await client.get("/v2/local/manifests/1")).status == 200
    assert (await client.get("/v2/local/manifests/1", headers=wrong)).status == 200
    assert (await client.get("/v2/local/tags/list")).status == 200

    good = {"Authorization": encode_basic_auth("pusher", "s3cret")}
    assert (await client.get("/v2/", headers=good)).status == 200
    for data in (image.config, *image.layers):
        response = await client.post(
            f"/v2/my-app/blobs/uploads/?digest={digest_of(data)}", data=data, headers=good
        )
        assert response.status == 201
    started = await client.post("/v2/my-app/blobs/uploads/", headers=good)
    location = started.headers["Location"]
    assert (await client.get(location)).status == 401
    assert (await client.get(location, headers=good)).status == 204
    assert (await client.delete(location, headers=good)).status == 204
    put = await client.put(
        "/v2/my-app/manifests/dev", data=image.manifest, headers={**good, "Content-Type": image.media_type}
    )
    assert put.status == 201
    await settle(registry)
    assert (await client.get("/v2/my-app/manifests/dev")).status == 200
    assert (await client.delete("/v2/my-app/manifests/dev", headers=good)).status == 202
