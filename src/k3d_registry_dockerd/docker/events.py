"""Following Docker's image events for as long as the registry runs, across dockerd restarts."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from .engine import DockerClient, DockerFailed, DockerUnavailable

log = logging.getLogger(__package__)
RETRY_FIRST = 0.5
RETRY_MAX = 10.0


class ImageEvents:
    """One stream of Docker's image events for every subscriber: each is called with every event, and
    when the stream has (re)opened (what happened while it was closed is not replayed, so it has to be
    looked at anew).

    A stream that breaks (dockerd stopped or restarted) is reopened, soon at first, then every RETRY_MAX
    seconds; each change between following and not is logged once.
    """

    def __init__(self, docker: DockerClient) -> None:
        self.docker = docker
        self._subscribers: list[tuple[Callable[[dict[str, Any]], None], Callable[[], None]]] = []
        self.following = False
        # Why the stream is not open, after it failed to open or broke.
        self.problem: str | None = None

    def subscribe(self, on_event: Callable[[dict[str, Any]], None], on_connect: Callable[[], None]) -> None:
        self._subscribers.append((on_event, on_connect))

    @property
    def wanted(self) -> bool:
        return bool(self._subscribers)

    async def run(self) -> None:
        delay = RETRY_FIRST
        while True:
            try:
                async with self.docker.image_events() as events:
                    if self.problem is not None:
                        log.info("following Docker's image events again")
                    self.following, self.problem, delay = True, None, RETRY_FIRST
                    for _on_event, on_connect in self._subscribers:
                        on_connect()
                    async for event in events:
                        for on_event, _on_connect in self._subscribers:
                            on_event(event)
            except (DockerUnavailable, DockerFailed) as exc:
                if self.problem is None:
                    log.warning("not following Docker's image events: %s; retrying", exc)
                self.following, self.problem = False, str(exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)
