"""Docker's answers about tags are given again only while nothing can have changed them: no image event
since (the event stream open all along) or the store's tag records unchanged; otherwise Docker is asked, as
on every request before."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from k3d_registry_dockerd.cache.store import Store
from k3d_registry_dockerd.mirror.answers import MISSING, DockerAnswers
from k3d_registry_dockerd.oci.reference import parse_repository
from k3d_registry_dockerd.sources.pieces import identity
from k3d_registry_dockerd.web.assembly import Registry, assemble

from .fakes import FakeDocker, local_image

REF = "docker.io/library/app:dev"
APP = parse_repository("app", None)


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not condition():
            await asyncio.sleep(0.01)


@pytest.fixture
def docker() -> FakeDocker:
    fake = FakeDocker()
    fake.images[REF] = local_image("app-1", REF)
    return fake


@pytest.fixture
async def registry(store: Store, docker: FakeDocker) -> Registry:
    registry = assemble(store, docker)  # type: ignore[arg-type]
    registry.start_background()
    await until(lambda: registry.events.following)
    yield registry
    await registry.stop()


async def test_a_tag_asked_again_is_answered_without_asking_docker(
    registry: Registry, docker: FakeDocker
) -> None:
    first = await registry.mirror.manifest_by_tag(APP, "dev", None)
    for _ in range(3):
        assert (await registry.mirror.manifest_by_tag(APP, "dev", None)).digest == first.digest
    assert docker.inspects == [REF]


async def test_an_image_event_makes_the_next_request_ask_docker(
    registry: Registry, docker: FakeDocker
) -> None:
    first = await registry.mirror.manifest_by_tag(APP, "dev", None)
    # Rebuilt: Docker reports it, and the next request sees the new image at once.
    docker.images[REF] = local_image("app-2", REF)
    await until(lambda: registry.images._answers is not None and registry.images._answers.get(REF) is MISSING)
    rebuilt = await registry.mirror.manifest_by_tag(APP, "dev", None)
    assert rebuilt.digest != first.digest
    assert docker.inspects == [REF, REF]


async def test_without_the_event_stream_every_request_asks_docker(
    registry: Registry, docker: FakeDocker
) -> None:
    await registry.mirror.manifest_by_tag(APP, "dev", None)
    docker.break_event_streams()
    await until(lambda: not registry.events.following)
    await registry.mirror.manifest_by_tag(APP, "dev", None)
    await registry.mirror.manifest_by_tag(APP, "dev", None)
    assert docker.inspects == [REF, REF, REF]


class _Events:
    """ImageEvents as DockerAnswers sees it: open or not, and its subscribers."""

    following = False

    def __init__(self) -> None:
        self.subscribers: list[Callable[..., None]] = []

    def subscribe(self, on_event: Callable[..., None], on_connect: Callable[[], None]) -> None:
        self.subscribers += [on_event, on_connect]


def test_the_store_s_tag_records_keep_answers_without_events(tmp_path: Path) -> None:
    records = tmp_path / "repositories.json"
    records.write_text("{}")
    answers = DockerAnswers(_Events(), lambda: identity(records.stat()))  # type: ignore[arg-type]
    token = answers.token()
    answers.keep(REF, token, {"Id": "sha256:1"})
    assert answers.get(REF) == {"Id": "sha256:1"}
    # Docker rewrites the file (a new one, renamed over it) whenever a tag changes.
    records.with_suffix(".new").write_text('{"app": 1}')
    os.replace(records.with_suffix(".new"), records)
    assert answers.get(REF) is MISSING


def test_an_answer_asked_while_something_changed_is_not_kept() -> None:
    events = _Events()
    events.following = True
    answers = DockerAnswers(events, lambda: None)  # type: ignore[arg-type]
    token = answers.token()
    events.subscribers[0]({"Action": "tag"})
    answers.keep(REF, token, {"Id": "sha256:1"})
    assert answers.get(REF) is MISSING
    # With neither events nor records nothing is kept.
    events.following = False
    answers.keep(REF, answers.token(), None)
    assert answers.get(REF) is MISSING
