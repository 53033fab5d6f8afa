"""The path of a pull on its own (`Mirror`, over the real parts `assemble` wires, with a fake Docker): the
current image first, the guard before any source works, the source last; and what is served when Docker is
away."""

from __future__ import annotations

import asyncio

import pytest

from k3d_registry_dockerd.cache.store import Store
from k3d_registry_dockerd.docker.engine import Credentials, DockerFailed
from k3d_registry_dockerd.oci.errors import RegistryError
from k3d_registry_dockerd.oci.reference import Digest, parse_repository
from k3d_registry_dockerd.web.assembly import Registry, assemble

from .fakes import FakeDocker, local_image

LOCAL_REF = "docker.io/library/app:dev"
LOCAL = parse_repository("app", None)
PRIVATE_NAME = "registry.example:5000/team/app"
PRIVATE_REF = f"{PRIVATE_NAME}:v1"
PRIVATE = parse_repository("team/app", "registry.example:5000")
OWNER = Credentials("puller", "s3cret-pw")


@pytest.fixture
def docker() -> FakeDocker:
    fake = FakeDocker()
    fake.images[LOCAL_REF] = local_image("app-1", LOCAL_REF)
    fake.upstream[PRIVATE_REF] = local_image("private-1", PRIVATE_REF)
    fake.private[PRIVATE_NAME] = OWNER
    return fake


@pytest.fixture
def registry(store: Store, docker: FakeDocker) -> Registry:
    return assemble(store, docker)  # type: ignore[arg-type]


async def refused(work: object) -> RegistryError:
    with pytest.raises(RegistryError) as caught:
        await work  # type: ignore[misc]
    return caught.value


async def test_a_tag_is_inspected_on_every_request_and_exported_once_per_image(
    registry: Registry, docker: FakeDocker
) -> None:
    first = await registry.mirror.manifest_by_tag(LOCAL, "dev", None)
    again = await registry.mirror.manifest_by_tag(LOCAL, "dev", None)
    assert docker.inspects == [LOCAL_REF, LOCAL_REF] and docker.saves == [LOCAL_REF]
    assert again.digest == first.digest
    docker.images[LOCAL_REF] = local_image("app-2", LOCAL_REF)
    rebuilt = await registry.mirror.manifest_by_tag(LOCAL, "dev", None)
    assert rebuilt.digest != first.digest and docker.saves == [LOCAL_REF, LOCAL_REF]


async def test_requests_arriving_during_an_inspect_share_the_next_one(
    registry: Registry, docker: FakeDocker
) -> None:
    await registry.mirror.manifest_by_tag(LOCAL, "dev", None)
    docker.inspects.clear()
    await asyncio.gather(*(registry.mirror.manifest_by_tag(LOCAL, "dev", None) for _ in range(20)))
    assert len(docker.inspects) <= 2


async def test_private_content_is_refused_before_any_source_works(
    registry: Registry, docker: FakeDocker
) -> None:
    # The credentialed pull makes the image private.
    await registry.mirror.manifest_by_tag(PRIVATE, "v1", OWNER)
    assert docker.saves == [PRIVATE_REF]
    # Another tag of the same image, never exported: refused before an export could start.
    docker.images[f"{PRIVATE_NAME}:v2"] = docker.images[PRIVATE_REF]
    error = await refused(registry.mirror.manifest_by_tag(PRIVATE, "v2", None))
    assert error.code == "UNAUTHORIZED"
    assert docker.saves == [PRIVATE_REF]
    assert (await registry.mirror.manifest_by_tag(PRIVATE, "v2", OWNER)).digest
    assert docker.saves == [PRIVATE_REF, f"{PRIVATE_NAME}:v2"]


async def test_a_request_for_an_image_being_pulled_waits_until_it_is_guarded(
    registry: Registry, docker: FakeDocker, monkeypatch: pytest.MonkeyPatch
) -> None:
    pulled = asyncio.Event()
    protect = registry.guard.protect

    async def slow_protect(*args: object) -> None:
        pulled.set()
        await asyncio.sleep(0.1)
        await protect(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(registry.guard, "protect", slow_protect)
    owner = asyncio.ensure_future(registry.mirror.manifest_by_tag(PRIVATE, "v1", OWNER))
    await pulled.wait()
    # Docker has the image now, but it is not marked private yet: this request must not get it.
    error = await refused(registry.mirror.manifest_by_tag(PRIVATE, "v1", None))
    assert error.code == "UNAUTHORIZED"
    assert (await owner).digest


async def test_without_docker_a_cached_tag_is_served_as_it_was(
    registry: Registry, docker: FakeDocker
) -> None:
    served = await registry.mirror.manifest_by_tag(LOCAL, "dev", None)
    docker.unavailable = True
    stale = await registry.mirror.manifest_by_tag(LOCAL, "dev", None)
    assert stale.digest == served.digest
    stale_count = registry.metrics.registry.get_sample_value(
        "k3d_registry_manifest_cache_total", {"result": "stale"}
    )
    assert stale_count == 1
    blob = docker.images[LOCAL_REF].image.layer_digests[0]  # type: ignore[union-attr]
    found = await registry.mirror.blob(LOCAL, Digest.parse(blob))
    assert found.digest == blob
    error = await refused(registry.mirror.manifest_by_tag(parse_repository("never", None), "dev", None))
    assert error.code == "UNAVAILABLE"


async def test_a_blob_is_served_only_under_a_repository_that_references_it(registry: Registry) -> None:
    served = await registry.mirror.manifest_by_tag(LOCAL, "dev", None)
    config = served.body.split(b'"digest":"', 2)[1].split(b'"', 1)[0].decode()
    assert (await registry.mirror.blob(LOCAL, Digest.parse(config))).digest == config
    error = await refused(registry.mirror.blob(parse_repository("other", None), Digest.parse(config)))
    assert error.code == "BLOB_UNKNOWN"


async def test_a_digest_served_before_needs_no_docker(registry: Registry, docker: FakeDocker) -> None:
    served = await registry.mirror.manifest_by_tag(LOCAL, "dev", None)
    docker.unavailable = True
    again = await registry.mirror.manifest_by_digest(LOCAL, Digest.parse(served.digest), None)
    assert again.body == served.body


async def test_an_error_docker_answers_a_lookup_with_is_a_503(registry: Registry, docker: FakeDocker) -> None:
    docker.inspect_error = DockerFailed("Docker answered 500: image not known")
    error = await refused(registry.mirror.manifest_by_tag(LOCAL, "dev", None))
    assert (error.code, error.status) == ("UNAVAILABLE", 503)
    assert "image not known" in str(error.detail)
