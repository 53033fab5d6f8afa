"""Pre-exports of moved tags: the scheduling rules, over a real registry and store with a fake Docker."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import pytest

from k3d_registry_dockerd.cache.store import RepositoryRecord, Store, TagEntry
from k3d_registry_dockerd.mirror.prefetch import (
    Prefetcher,
    PrefetchQueue,
    due,
    expected_growth,
    moved_ref,
    served_tags,
)
from k3d_registry_dockerd.oci.reference import parse_repository
from k3d_registry_dockerd.web.assembly import Registry, assemble
from k3d_registry_dockerd.web.status import ImageList, RecentProblems, RecentPulls, snapshot

from .fakes import FakeDocker, local_image

APP = "docker.io/library/app:dev"
OTHER = "docker.io/library/other:dev"
WEEK = 7 * 86400.0


def entry(image_id: str, last_used: float | None, exported_at: float = 0.0) -> TagEntry:
    return TagEntry(
        "sha256:" + "d" * 64,
        "application/vnd.oci.image.manifest.v1+json",
        image_id,
        exported_at,
        None,
        last_used,
    )


# ---- pure rules ------------------------------------------------------------------------------------


def test_the_newest_move_goes_first_and_a_tag_that_moves_again_replaces_its_job() -> None:
    queue = PrefetchQueue()
    queue.want("a", "1", "sha256:a1")
    queue.want("b", "1", "sha256:b1")
    queue.want("a", "1", "sha256:a2")
    assert [(j.name, j.image_id) for j in queue.jobs()] == [("a", "sha256:a2"), ("b", "sha256:b1")]
    assert queue.want("b", "1", "sha256:b1").seen == queue.jobs()[1].seen  # the same move is no new one
    first = queue.pop()
    assert first is not None and (first.name, first.image_id) == ("a", "sha256:a2")
    assert queue.drop("b", "1") is not None
    assert queue.pop() is None and len(queue) == 0


def test_only_tags_pulled_within_the_max_age_are_kept_warm() -> None:
    now = 1_000_000.0
    record = RepositoryRecord(
        "docker.io/library/app",
        tags={
            "fresh": entry("sha256:1", now - 60),
            "old": entry("sha256:2", now - WEEK - 1),
            "never-used": entry("sha256:3", None, exported_at=now - 3600),
        },
    )
    assert set(served_tags([record], now, WEEK)) == {
        "docker.io/library/app:fresh",
        "docker.io/library/app:never-used",
    }


def test_due_when_docker_has_another_image_than_the_cache_answers_with() -> None:
    served = entry("sha256:old", 0.0)
    assert due(served, "sha256:new")
    assert not due(served, "sha256:old")
    assert not due(served, None)  # untagged in Docker: nothing to export


@pytest.mark.parametrize(
    ("event", "moved"),
    [
        (
            {"Action": "tag", "Actor": {"ID": "sha256:1", "Attributes": {"name": "my-app:dev"}}},
            "docker.io/library/my-app:dev",
        ),
        (
            {
                "Action": "pull",
                "Actor": {
                    "ID": "127.0.0.1:5001/team/app:1",
                    "Attributes": {"name": "127.0.0.1:5001/team/app:1"},
                },
            },
            "127.0.0.1:5001/team/app:1",
        ),
        # The classic store names only the image for untag and load: any tag may have moved.
        ({"Action": "untag", "Actor": {"ID": "sha256:1", "Attributes": {"name": "sha256:1"}}}, True),
        ({"Action": "load", "Actor": {"ID": "sha256:1", "Attributes": {}}}, True),
        ({"Action": "create", "Actor": {"ID": "sha256:1", "Attributes": {"name": "sha256:1"}}}, True),
        # Podman names a build's image by its bare ID.
        ({"Action": "build", "Actor": {"ID": "", "Attributes": {"name": "5a72454b9079e31d"}}}, True),
        ({"Action": "pull", "Actor": {"ID": "app@sha256:1", "Attributes": {"name": "app@sha256:1"}}}, None),
        # Our own exports and pushes move nothing.
        ({"Action": "save", "Actor": {"ID": "sha256:1", "Attributes": {"name": "sha256:1"}}}, None),
        ({"Action": "push", "Actor": {"ID": "app:1", "Attributes": {"name": "app:1"}}}, None),
    ],
)
def test_which_tags_an_event_may_have_moved(event: dict[str, Any], moved: str | bool | None) -> None:
    assert moved_ref(event) == moved


def test_expected_growth_leaves_out_layers_the_cache_holds() -> None:
    image = {"Size": 1000, "RootFS": {"Layers": ["sha256:held", "sha256:new"]}}
    sizes = {"sha256:held": 600}
    assert expected_growth(image, sizes.get) == 400
    assert expected_growth({"Size": 10, "RootFS": {"Layers": ["sha256:held"]}}, sizes.get) == 0
    assert expected_growth({}, sizes.get) == 0


# ---- with the registry -----------------------------------------------------------------------------


async def until(condition: Callable[[], bool], what: str) -> None:
    """Waits for `condition` (work runs in the background); fails after a generous while."""
    try:
        async with asyncio.timeout(10):
            while not condition():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


@pytest.fixture
def docker() -> FakeDocker:
    fake = FakeDocker()
    fake.images[APP] = local_image("app-1", APP)
    fake.images[OTHER] = local_image("other-1", OTHER)
    return fake


@pytest.fixture
def registry(store: Store, docker: FakeDocker) -> Registry:
    return assemble(store, docker, prefetch_max_age=WEEK)  # type: ignore[arg-type]


@pytest.fixture
async def prefetcher(registry: Registry, docker: FakeDocker) -> AsyncIterator[Prefetcher]:
    running = registry.prefetcher
    assert running is not None
    registry.start_background()
    await until(lambda: docker.event_streams == 1, "the event stream open")
    yield running
    await registry.stop()


async def pull(registry: Registry, ref: str) -> str:
    name, _, tag = ref.removeprefix("docker.io/library/").rpartition(":")
    return (await registry.mirror.manifest_by_tag(parse_repository(name, None), tag, None)).digest


def count(registry: Registry, metric: str, **labels: str) -> float:
    return registry.metrics.registry.get_sample_value(metric, labels) or 0.0


async def test_a_served_tag_that_moves_is_exported_before_it_is_asked_for(
    registry: Registry, docker: FakeDocker, prefetcher: Prefetcher
) -> None:
    await pull(registry, APP)
    rebuilt = local_image("app-2", APP)
    docker.retag(APP, rebuilt)
    await until(lambda: docker.saves == [APP, APP] and prefetcher.running is None, "the pre-export")
    assert count(registry, "k3d_registry_prefetches_total", outcome="exported") == 1
    record = registry.store.record("docker.io/library/app")
    assert record is not None and record.tags["dev"].image_id == rebuilt.id and record.tags["dev"].prefetched

    served = await registry.mirror.manifest_by_tag(parse_repository("app", None), "dev", None)
    assert docker.saves == [APP, APP]  # the pull found it exported
    assert not served.cold
    assert count(registry, "k3d_registry_prefetch_hits_total", state="ready") == 1
    assert not registry.store.record("docker.io/library/app").tags["dev"].prefetched  # type: ignore[union-attr]


async def test_a_tag_never_served_is_left_alone(
    registry: Registry, docker: FakeDocker, prefetcher: Prefetcher
) -> None:
    await pull(registry, APP)
    docker.retag(OTHER, local_image("other-2", OTHER))
    docker.retag(APP, local_image("app-2", APP))
    await until(lambda: len(docker.saves) == 2 and prefetcher.running is None, "the pre-export")
    await asyncio.sleep(0.2)
    assert docker.saves == [APP, APP]


async def test_a_tag_not_pulled_within_the_max_age_is_left_alone(
    registry: Registry, docker: FakeDocker, prefetcher: Prefetcher
) -> None:
    await pull(registry, APP)
    await registry.records.edit(
        "docker.io/library/app",
        lambda record: RepositoryRecord(
            record.name,
            {"dev": TagEntry(**{**vars(record.tags["dev"]), "last_used": time.time() - WEEK - 60})},
            record.manifests,
        ),
    )
    docker.retag(APP, local_image("app-2", APP))
    await asyncio.sleep(0.3)
    assert docker.saves == [APP]


async def test_a_tag_that_moves_again_cancels_its_pre_export(
    registry: Registry, docker: FakeDocker, prefetcher: Prefetcher
) -> None:
    await pull(registry, APP)
    docker.save_gate = asyncio.Event()
    docker.retag(APP, local_image("app-2", APP))
    await until(lambda: len(docker.saves) == 2, "the first pre-export started")
    third = local_image("app-3", APP)
    docker.retag(APP, third)
    await until(
        lambda: count(registry, "k3d_registry_prefetches_total", outcome="superseded") == 1, "it stopped"
    )
    docker.save_gate.set()
    await until(
        lambda: count(registry, "k3d_registry_prefetches_total", outcome="exported") == 1, "the second"
    )
    assert registry.store.record("docker.io/library/app").tags["dev"].image_id == third.id  # type: ignore[union-attr]
    # Nothing the cancelled export stored stays behind unreferenced.
    stored = {f"sha256:{path.name}" for path in registry.store.blobs_dir.glob("*/*")}
    assert stored <= set().union(*(record.digests() for record in registry.store.records()))


async def test_a_pull_during_the_pre_export_joins_it(
    registry: Registry, docker: FakeDocker, prefetcher: Prefetcher
) -> None:
    await pull(registry, APP)
    docker.save_gate = asyncio.Event()
    rebuilt = local_image("app-2", APP)
    docker.retag(APP, rebuilt)
    await until(lambda: len(docker.saves) == 2, "the pre-export started")
    request = asyncio.ensure_future(pull(registry, APP))
    await until(lambda: count(registry, "k3d_registry_prefetch_hits_total", state="running") == 1, "the join")
    docker.save_gate.set()
    await request
    assert docker.saves == [APP, APP]
    entry_ = registry.store.record("docker.io/library/app").tags["dev"]  # type: ignore[union-attr]
    assert entry_.image_id == rebuilt.id and not entry_.prefetched  # a request used it
    assert count(registry, "k3d_registry_prefetches_total", outcome="exported") == 1


async def test_a_request_s_export_goes_ahead_of_pre_exports(
    registry: Registry, docker: FakeDocker, prefetcher: Prefetcher
) -> None:
    await pull(registry, APP)
    docker.save_gate = asyncio.Event()
    request = asyncio.ensure_future(pull(registry, OTHER))
    await until(lambda: docker.saves == [APP, OTHER], "the request's export started")
    docker.retag(APP, local_image("app-2", APP))
    await asyncio.sleep(0.3)
    assert docker.saves == [APP, OTHER]  # the pre-export waits
    assert [job.ref for job in prefetcher.queue.jobs()] == [APP]
    docker.save_gate.set()
    await request
    await until(lambda: docker.saves == [APP, OTHER, APP], "the pre-export after it")


async def test_one_pre_export_at_a_time_newest_move_first(
    registry: Registry, docker: FakeDocker, prefetcher: Prefetcher
) -> None:
    third = "docker.io/library/third:dev"
    docker.images[third] = local_image("third-1", third)
    for ref in (APP, OTHER, third):
        await pull(registry, ref)
    docker.save_gate = asyncio.Event()
    docker.retag(APP, local_image("app-2", APP))
    await until(lambda: len(docker.saves) == 4, "the first pre-export started")
    docker.retag(OTHER, local_image("other-2", OTHER))
    await asyncio.sleep(0.1)
    docker.retag(third, local_image("third-2", third))
    await asyncio.sleep(0.2)
    assert len(docker.saves) == 4  # one at a time
    docker.save_gate.set()
    await until(lambda: len(docker.saves) == 6 and prefetcher.running is None, "the rest")
    assert docker.saves[3:] == [APP, third, OTHER]


async def test_nothing_is_pre_exported_past_the_cache_limit(store: Store, docker: FakeDocker) -> None:
    registry = assemble(store, docker, cache_max_size=1, prefetch_max_age=WEEK)  # type: ignore[arg-type]
    running = registry.prefetcher
    assert running is not None
    registry.start_background()
    try:
        await pull(registry, APP)
        rebuilt = local_image("app-2", APP)
        rebuilt.inspect["Size"] = 10_000
        docker.retag(APP, rebuilt)
        await until(
            lambda: count(registry, "k3d_registry_prefetches_total", outcome="over_limit") == 1, "skipped"
        )
        assert docker.saves == [APP]
    finally:
        await registry.stop()


async def test_nothing_is_exported_when_containerd_s_store_serves_docker_s_images(
    registry: Registry, docker: FakeDocker, prefetcher: Prefetcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    await pull(registry, APP)

    async def zero_copy(_info: Any) -> bool:
        return False

    monkeypatch.setattr(registry.sources, "exports_needed", zero_copy)
    docker.retag(APP, local_image("app-2", APP))
    await asyncio.sleep(0.3)
    assert docker.saves == [APP] and len(prefetcher.queue) == 0


async def test_a_tag_moved_while_docker_was_away_is_found_when_the_events_resume(
    registry: Registry, docker: FakeDocker, prefetcher: Prefetcher
) -> None:
    await pull(registry, APP)
    docker.unavailable = True
    docker.break_event_streams()
    await until(lambda: not prefetcher.events.following, "the stream broken")
    # A load on the classic store names no tag, and this one happened while nobody listened.
    docker.images[APP] = local_image("app-2", APP)
    docker.unavailable = False
    await until(lambda: docker.event_streams == 2, "the stream reopened")
    await until(lambda: len(docker.saves) == 2 and prefetcher.running is None, "the pre-export")
    assert prefetcher.events.following and prefetcher.events.problem is None


async def test_the_status_page_shows_a_pre_export_running_and_done(
    registry: Registry, docker: FakeDocker, prefetcher: Prefetcher
) -> None:
    await pull(registry, APP)
    docker.save_gate = asyncio.Event()
    docker.retag(APP, local_image("app-2", APP))
    await until(lambda: len(docker.saves) == 2, "the pre-export started")
    problems, pulls, listing = (
        RecentProblems(),
        RecentPulls(),
        ImageList(registry.store, registry.guard.private_repositories),
    )
    running = await snapshot(registry, problems, pulls, listing)
    assert [(t["kind"], t["ref"]) for t in running["transfers"]] == [("pre-export", APP)]
    assert running["prefetch"]["running"] == APP and running["prefetch"]["following"]
    docker.save_gate.set()
    await until(lambda: prefetcher.running is None, "the pre-export done")
    done = await snapshot(registry, problems, pulls, listing)
    assert done["transfers"] == []
    assert [(o["ref"], o["outcome"]) for o in done["prefetch"]["recent"]] == [(APP, "exported")]
    assert (await snapshot(replace(registry, prefetcher=None), problems, pulls, listing))["prefetch"] is None
