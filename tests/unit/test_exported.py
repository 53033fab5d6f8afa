"""The export path on its own: `ExportedContent` over a real store and a fake Docker's save streams."""

from __future__ import annotations

import asyncio
import time

import pytest

from k3d_registry_dockerd.cache.records import Records
from k3d_registry_dockerd.cache.space import FreeSpace
from k3d_registry_dockerd.cache.store import Store
from k3d_registry_dockerd.common.metrics import Metrics
from k3d_registry_dockerd.common.progress import Transfers
from k3d_registry_dockerd.docker.engine import DaemonInfo
from k3d_registry_dockerd.oci.errors import RegistryError
from k3d_registry_dockerd.oci.reference import parse_repository
from k3d_registry_dockerd.sources.exported import ExportedContent

from .fakes import FakeDocker, LocalImage, local_image

APP_REF = "docker.io/library/app:dev"
APP = parse_repository("app", None)


@pytest.fixture
def docker() -> FakeDocker:
    fake = FakeDocker()
    fake.images[APP_REF] = local_image("app-1", APP_REF)
    return fake


def exported_content(
    store: Store, docker: FakeDocker, limit: int | None = None, in_use_grace: float = 300.0
) -> ExportedContent:
    metrics = Metrics()
    records = Records(store, metrics, limit, in_use_grace)
    space = FreeSpace(store.root)
    return ExportedContent(store, docker, records, Transfers(), metrics, space)  # type: ignore[arg-type]


@pytest.fixture
def exported(store: Store, docker: FakeDocker) -> ExportedContent:
    return exported_content(store, docker)


def inspect(image: LocalImage) -> dict[str, str]:
    return {"Id": image.id}


async def held_exports(docker: FakeDocker) -> tuple[DaemonInfo, dict[str, str]]:
    """Docker's facts and its image of the app, with every export held until `docker.save_gate` is set."""
    docker.save_gate = asyncio.Event()
    return await docker.daemon(), inspect(docker.images[APP_REF])


def stored(store: Store) -> set[str]:
    return {f"sha256:{path.name}" for path in store.blobs_dir.glob("*/*")}


async def test_concurrent_requests_for_one_image_share_one_export(
    exported: ExportedContent, docker: FakeDocker
) -> None:
    info, image = await held_exports(docker)
    waiting = [asyncio.ensure_future(exported.by_tag(APP, "dev", image, info, None)) for _ in range(5)]
    await asyncio.sleep(0.05)
    assert [t.ref for t in exported.transfers.running("export")] == [APP_REF]
    docker.save_gate.set()
    served = await asyncio.gather(*waiting)
    assert docker.saves == [APP_REF]
    assert {s.digest for s in served} == {docker.images[APP_REF].image.digest}  # type: ignore[union-attr]
    assert all(s.cold for s in served) and exported.transfers.running() == []


async def test_a_cached_tag_is_answered_without_docker_until_the_image_changes(
    exported: ExportedContent, docker: FakeDocker, store: Store
) -> None:
    info = await docker.daemon()
    first = await exported.by_tag(APP, "dev", inspect(docker.images[APP_REF]), info, None)
    again = await exported.by_tag(APP, "dev", inspect(docker.images[APP_REF]), info, None)
    assert docker.saves == [APP_REF] and again.digest == first.digest and not again.cold
    docker.images[APP_REF] = local_image("app-2", APP_REF)
    rebuilt = await exported.by_tag(APP, "dev", inspect(docker.images[APP_REF]), info, None)
    assert docker.saves == [APP_REF, APP_REF] and rebuilt.digest != first.digest
    # The old image stays servable by digest (a pull in progress may still want it).
    assert exported.recorded(APP, first.digest) is not None


async def test_the_last_use_is_written_at_most_once_a_minute(
    exported: ExportedContent, docker: FakeDocker, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = await docker.daemon()
    await exported.by_tag(APP, "dev", inspect(docker.images[APP_REF]), info, None)
    writes: list[str] = []
    save_record = store.save_record
    monkeypatch.setattr(
        store, "save_record", lambda record: (writes.append(record.name), save_record(record))
    )
    for _ in range(3):
        await exported.by_tag(APP, "dev", inspect(docker.images[APP_REF]), info, None)
    assert writes == []
    now = time.time()
    monkeypatch.setattr("k3d_registry_dockerd.sources.exported.time.time", lambda: now + 61)
    await exported.by_tag(APP, "dev", inspect(docker.images[APP_REF]), info, None)
    assert writes == ["docker.io/library/app"]


async def test_a_failed_export_leaves_nothing_behind(
    exported: ExportedContent, docker: FakeDocker, store: Store
) -> None:
    good = docker.images[APP_REF]
    # The stream ends halfway: every blob it stored before is removed again.
    docker.images[APP_REF] = LocalImage(good.id, good.save[: len(good.save) // 2])
    info = await docker.daemon()
    with pytest.raises(RegistryError) as failed:
        await exported.by_tag(APP, "dev", inspect(good), info, None)
    assert failed.value.code == "UNAVAILABLE" and failed.value.status == 502
    assert stored(store) == set() and exported.cached_tag(APP, "dev") is None


async def test_a_digest_docker_s_export_lacks_costs_one_export(
    exported: ExportedContent, docker: FakeDocker
) -> None:
    info = await docker.daemon()
    image = docker.images[APP_REF]
    ref = f"docker.io/library/app@{'sha256:' + 'e' * 64}"
    docker.images[ref] = image
    for _ in range(3):
        assert await exported.by_digest(APP, "sha256:" + "e" * 64, inspect(image), info) is None
    assert docker.saves == [ref]


async def test_a_request_joins_a_pre_export_of_its_image(
    exported: ExportedContent, docker: FakeDocker
) -> None:
    info, image = await held_exports(docker)
    background = asyncio.ensure_future(exported.prefetch(APP, "dev", image, info))
    await asyncio.sleep(0.05)
    assert [t.kind for t in exported.transfers.running()] == ["pre-export"]
    request = asyncio.ensure_future(exported.by_tag(APP, "dev", image, info, None))
    await asyncio.sleep(0.05)
    # Joined: it is the request's export now, and nothing cancels it.
    assert [t.kind for t in exported.transfers.running()] == ["export"]
    assert not exported.abandon(APP, "dev", image["Id"])
    docker.save_gate.set()
    await asyncio.gather(background, request)
    assert docker.saves == [APP_REF]
    hits = exported.metrics.registry.get_sample_value(
        "k3d_registry_prefetch_hits_total", {"state": "running"}
    )
    assert hits == 1


async def test_an_abandoned_pre_export_stores_nothing(
    exported: ExportedContent, docker: FakeDocker, store: Store
) -> None:
    info, image = await held_exports(docker)
    background = asyncio.ensure_future(exported.prefetch(APP, "dev", image, info))
    await asyncio.sleep(0.05)
    assert exported.abandon(APP, "dev", image["Id"])
    with pytest.raises(asyncio.CancelledError):
        await background
    assert stored(store) == set() and exported.cached_tag(APP, "dev") is None
    assert exported.transfers.running() == []


async def test_past_the_limit_the_least_recently_used_image_goes(store: Store, docker: FakeDocker) -> None:
    other_ref = "docker.io/library/other:dev"
    docker.images[other_ref] = local_image("other-1", other_ref)
    info = await docker.daemon()
    exported = exported_content(store, docker, limit=1, in_use_grace=0.2)
    first = await exported.by_tag(APP, "dev", inspect(docker.images[APP_REF]), info, None)
    # Fetched a moment ago: in use, so it stays although the cache is over its limit.
    await exported.by_tag(
        parse_repository("other", None), "dev", inspect(docker.images[other_ref]), info, None
    )
    assert exported.cached_tag(APP, "dev") is not None
    await asyncio.sleep(0.3)
    await exported.by_tag(
        parse_repository("other", None), "dev", inspect(docker.images[other_ref]), info, None
    )
    docker.images[other_ref] = local_image("other-2", other_ref)
    await exported.by_tag(
        parse_repository("other", None), "dev", inspect(docker.images[other_ref]), info, None
    )
    assert exported.cached_tag(APP, "dev") is None and first.digest not in stored(store)
    evicted = exported.metrics.registry.get_sample_value("k3d_registry_evicted_images_total")
    assert evicted is not None and evicted >= 1
