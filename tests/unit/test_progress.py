"""Progress of pulls and exports: the log line, the status figures, dockerd's pull events."""

from __future__ import annotations

import asyncio
import logging

import pytest

from k3d_registry_dockerd.common import progress
from k3d_registry_dockerd.common.progress import Transfer, Transfers
from k3d_registry_dockerd.docker.engine import PullEvents


def test_waiting_for_the_first_byte() -> None:
    export = Transfer("export", "docker.io/library/big:1", expected=3 << 30)
    assert export.line().startswith("export of docker.io/library/big:1: waiting for Docker's first byte, ")
    assert Transfer("pull", "x:1").line().startswith("pull of x:1 through Docker: waiting for the upstream, ")


def test_bytes_of_expected_rate_and_time_left(monkeypatch: pytest.MonkeyPatch) -> None:
    export = Transfer("export", "big:1", expected=4 << 30, started=100.0)
    export.counter = lambda: 1 << 30
    monkeypatch.setattr(progress.time, "monotonic", lambda: 110.0)
    assert export.line() == "export of big:1: 1 GiB of ~4 GiB, 102 MiB/s, about 30.0s left (10.0s so far)"
    assert export.as_json() == {
        "kind": "export",
        "ref": "big:1",
        "seconds": 10.0,
        "bytes": 1 << 30,
        "expected_bytes": 4 << 30,
    }


def test_pull_events_count_layers_bytes() -> None:
    pull = Transfer("pull", "docker.io/library/alpine:latest")
    events = PullEvents(pull)
    events.update(
        {"id": "a", "status": "Downloading", "progressDetail": {"current": 500_000, "total": 1_000_000}}
    )
    events.update({"id": "b", "status": "Downloading", "progressDetail": {"current": 1, "total": 3_000_000}})
    events.update({"id": "a", "status": "Pull complete"})
    events.update({"id": "c", "status": "Already exists"})
    events.update({"status": "Digest: sha256:abc"})
    assert events.done_layers == {"a", "c"}
    assert (pull.done, pull.expected) == (1_000_001, 4_000_000)


async def test_a_tracked_transfer_is_listed_and_reported_while_the_block_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    transfer = Transfer("pull", "x:1", expected=100, received=50)
    transfers = Transfers()
    with caplog.at_level(logging.INFO, logger="k3d_registry_dockerd.common"):
        async with transfers.track(transfer, interval=0.01):
            assert transfers.running() == [transfer] and transfers.running("export") == []
            await asyncio.sleep(0.05)
    assert transfers.running() == []
    lines = [m for m in caplog.messages if m.startswith("pull of x:1 through Docker: 50 B of 100 B")]
    assert len(lines) >= 2
    count = len(caplog.messages)
    await asyncio.sleep(0.03)
    assert len(caplog.messages) == count
