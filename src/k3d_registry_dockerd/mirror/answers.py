"""Docker's answers about references (image inspects), kept for as long as nothing can have changed them.

Asking Docker on every request by tag keeps each answer fresh, but through a busy event loop a round trip
to Docker costs several of the loop's turns: at 1,000 connections a manifest request by tag waited 614 ms
(server side, p50) for answers Docker gave in a millisecond. An answer is kept with what Docker's state
was when it was asked (a token) and given again only while that is unchanged:

- the store's own record of its tags (Docker's classic store's `repositories.json`, Podman's
  `images.json`) when it can be read here: the daemon rewrites it before a tag, pull, build, load or
  removal returns, so an unchanged file means unchanged answers, with no race;
- Docker's image events otherwise: every image event, and every time the stream opens or breaks, makes all
  kept answers old. A change is then seen as soon as its event arrives, milliseconds after it happened.

With neither (the event stream not open and no record to read) every request asks Docker, as before.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

from ..common.bounded import BoundedDict
from ..docker.events import ImageEvents

ANSWERS_LIMIT = 4096
MISSING: Any = object()


class DockerAnswers:
    def __init__(self, events: ImageEvents, records: Callable[[], Hashable | None]) -> None:
        self._events = events
        # The identity of the store's tag records, or None when there are none to read.
        self._records = records
        # Image events and event-stream (re)openings seen: each one makes the answers before it old.
        self._generation = 0
        self._answers: BoundedDict[str, tuple[Hashable, dict[str, Any] | None]] = BoundedDict(ANSWERS_LIMIT)
        events.subscribe(self._changed, self._changed)

    def _changed(self, _event: dict[str, Any] | None = None) -> None:
        self._generation += 1
        self._answers.clear()

    def token(self) -> Hashable | None:
        """What Docker's state is now, as far as it can be told without asking; None when it cannot be."""
        records = self._records()
        following = self._generation if self._events.following else None
        if records is None and following is None:
            return None
        return following, records

    def get(self, ref: str) -> dict[str, Any] | None:
        """The answer kept for `ref` if nothing changed since it was given, else MISSING."""
        kept = self._answers.get(ref)
        if kept is None or kept[0] is None or kept[0] != self.token():
            return MISSING
        return kept[1]

    def keep(self, ref: str, token: Hashable | None, answer: dict[str, Any] | None) -> None:
        """Keeps Docker's `answer` for `ref`, asked when the state was `token` (taken before asking: a
        change while Docker answered makes it old at once)."""
        if token is not None and token == self.token():
            self._answers[ref] = (token, answer)
