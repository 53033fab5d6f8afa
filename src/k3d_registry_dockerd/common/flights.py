"""Sharing one call among concurrent callers: once per key (exports, pulls) or once per fresh look
(Docker inspects), so many nodes asking at once cost one unit of work."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


class SingleFlight:
    """Runs one task per key; concurrent callers share its result. A waiter leaving does not cancel it."""

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[Any]] = {}

    async def run(self, key: str, factory: Callable[[], Awaitable[T]]) -> T:
        task = self._tasks.get(key)
        if task is None:
            task = asyncio.ensure_future(factory())
            self._tasks[key] = task
            task.add_done_callback(lambda done: self._finished(key, done))
        return await asyncio.shield(task)

    def __contains__(self, key: str) -> bool:
        return key in self._tasks

    def cancel(self, key: str) -> bool:
        """Cancels the task running for `key` (its waiters get CancelledError); False when none runs.
        A caller arriving afterwards starts a new task rather than joining the cancelled one."""
        task = self._tasks.pop(key, None)
        if task is None:
            return False
        task.cancel()
        return True

    def _finished(self, key: str, task: asyncio.Task[Any]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
        # Waiters that stayed got the exception; one nobody waited for must not be reported as lost.
        if not task.cancelled():
            task.exception()


class FreshFlight:
    """Shares a call among concurrent callers, but only one that started after each caller arrived, so
    every answer is as fresh as an own call (a tag rebuilt a moment ago is seen). Callers arriving while
    a call runs share the next one: a thousand nodes asking about one tag cost two calls, not a thousand."""

    def __init__(self) -> None:
        self._running: dict[str, asyncio.Task[Any]] = {}
        self._next: dict[str, asyncio.Task[Any]] = {}

    async def run(self, key: str, factory: Callable[[], Awaitable[T]]) -> T:
        running = self._running.get(key)
        if running is None:
            task = self._start(key, factory)
        else:
            task = self._next.get(key) or self._queue(key, running, factory)
        return await asyncio.shield(task)

    def _start(self, key: str, factory: Callable[[], Awaitable[T]]) -> asyncio.Task[T]:
        task = asyncio.ensure_future(factory())
        self._running[key] = task
        task.add_done_callback(lambda done: self._finished(key, done))
        return task

    def _queue(
        self, key: str, running: asyncio.Task[Any], factory: Callable[[], Awaitable[T]]
    ) -> asyncio.Task[T]:
        async def after_running() -> T:
            try:
                await asyncio.wait({running})
            finally:
                self._next.pop(key, None)
            return await self._start(key, factory)

        task = asyncio.ensure_future(after_running())
        self._next[key] = task
        task.add_done_callback(lambda done: None if done.cancelled() else done.exception())
        return task

    def _finished(self, key: str, task: asyncio.Task[Any]) -> None:
        if self._running.get(key) is task:
            del self._running[key]
        if not task.cancelled():
            task.exception()
