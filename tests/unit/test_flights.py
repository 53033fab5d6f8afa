"""Sharing Docker calls among concurrent requests without serving anything older than the request."""

from __future__ import annotations

import asyncio

import pytest

from k3d_registry_dockerd.common.flights import FreshFlight


class Calls:
    """A call that blocks until released and answers with its sequence number."""

    def __init__(self) -> None:
        self.started = 0
        self.release = asyncio.Event()
        self.fail = False

    async def call(self) -> int:
        self.started += 1
        number = self.started
        await self.release.wait()
        if self.fail:
            raise RuntimeError(f"call {number} failed")
        return number


async def test_callers_arriving_during_a_call_share_the_next_one() -> None:
    flight, calls = FreshFlight(), Calls()
    first = asyncio.create_task(flight.run("ref", calls.call))
    await asyncio.sleep(0)
    later = [asyncio.create_task(flight.run("ref", calls.call)) for _ in range(50)]
    await asyncio.sleep(0)
    assert calls.started == 1
    calls.release.set()
    assert await first == 1
    # None of them gets the call that was already running when it arrived.
    assert await asyncio.gather(*later) == [2] * 50
    assert calls.started == 2


async def test_an_idle_key_calls_at_once_and_keys_do_not_share() -> None:
    flight, calls = FreshFlight(), Calls()
    calls.release.set()
    assert await flight.run("a", calls.call) == 1
    assert await flight.run("a", calls.call) == 2
    assert await asyncio.gather(flight.run("a", calls.call), flight.run("b", calls.call)) == [3, 4]


async def test_a_failure_reaches_every_caller_of_that_call_only() -> None:
    flight, calls = FreshFlight(), Calls()
    calls.fail = True
    first = asyncio.create_task(flight.run("ref", calls.call))
    await asyncio.sleep(0)
    shared = [asyncio.create_task(flight.run("ref", calls.call)) for _ in range(3)]
    calls.release.set()
    with pytest.raises(RuntimeError, match="call 1"):
        await first
    for task in shared:
        with pytest.raises(RuntimeError, match="call 2"):
            await task
    calls.fail = False
    assert await flight.run("ref", calls.call) == 3


async def test_a_caller_leaving_does_not_cancel_the_shared_call() -> None:
    flight, calls = FreshFlight(), Calls()
    first = asyncio.create_task(flight.run("ref", calls.call))
    await asyncio.sleep(0)
    leaving = asyncio.create_task(flight.run("ref", calls.call))
    staying = asyncio.create_task(flight.run("ref", calls.call))
    await asyncio.sleep(0)
    leaving.cancel()
    first.cancel()
    calls.release.set()
    assert await staying == 2
    assert leaving.cancelled() and first.cancelled()
